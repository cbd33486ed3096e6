"""tasks/: BigBench reading, formatting and split, metrics, vocabulary, SeqIO tasks, CLI.

Expected prompt and answer strings below were written by hand from the task.json
entries (bigbench 1.0.0), not copied from this code's output.
"""

import dataclasses
import json
import socket
import subprocess
import sys

import gin
import numpy as np
import pytest

from tasks import bigbench as bb
from tasks import metrics
from tasks.__main__ import main as cli_main
from tasks.instructions import CORRECT, WRONG, prompt

# The reference table (HIR_REFERENCE.md, "Prompt and data format").
REFERENCE_SIZES = {
    "tracking_shuffled_objects_three_objects": (750, 600, 150),
    "tracking_shuffled_objects_five_objects": (1250, 1000, 250),
    "tracking_shuffled_objects_seven_objects": (1750, 1400, 350),
    "logical_deduction_three_objects": (300, 240, 60),
    "logical_deduction_five_objects": (500, 400, 100),
    "logical_deduction_seven_objects": (700, 560, 140),
    "date_understanding": (369, 295, 74),
    "object_counting": (1000, 800, 200),
    "penguins_in_a_table": (149, 119, 30),
    "geometric_shapes": (360, 288, 72),
    "reasoning_about_colored_objects": (2000, 1600, 400),
    "word_sorting": (1900, 1520, 380),
}
HEAD = "Solve the question with correct answer.\n\nQ: "


@pytest.fixture(scope="module")
def root():
    try:
        return bb.bigbench_tasks_dir()
    except bb.BigBenchNotFoundError as err:
        pytest.fail(f"BigBench task files are required for these tests:\n{err}")


def by_id(task, example_id):
    ex = bb.load_all_examples(task)[example_id]
    assert ex.example_id == example_id
    return ex


# ---------------------------------------------------------------------------------------
# Split.


@pytest.mark.parametrize("short", list(REFERENCE_SIZES))
def test_split_sizes_match_reference(root, short):
    n, n_train, n_test = REFERENCE_SIZES[short]
    assert bb.split_sizes(bb.TASK_PREFIX + short) == {"all": n, "train": n_train, "test": n_test}
    train = bb.load_examples(short, "train")
    test = bb.load_examples(short, "test")
    assert len(train) == n_train and len(test) == n_test
    assert {e.example_id for e in train}.isdisjoint({e.example_id for e in test})


def test_split_is_the_released_global_seed_permutation(root):
    state = np.random.get_state()
    np.random.seed(1)
    expected = np.random.permutation(300)
    np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    got = bb.split_indices(300)
    assert np.array_equal(np.random.get_state()[1], before)  # global RNG untouched
    assert got["train"].tolist() == expected[:240].tolist()
    assert got["test"].tolist() == expected[240:].tolist()
    train = bb.load_examples("hir_bigbench.logical_deduction_three_objects", "train")
    assert [e.example_id for e in train] == expected[:240].tolist()


def test_date_understanding_answer_a_trap(root):
    # Reference: the gold answer is "(A)" in 291/295 train and 73/74 test items; these
    # counts depend on the exact permutation.
    train = bb.load_examples("date_understanding", "train")
    test = bb.load_examples("date_understanding", "test")
    assert sum(e.answer == "(A)" for e in train) == 291
    assert sum(e.answer == "(A)" for e in test) == 73


def test_validation_carve_out(root):
    train = bb.load_examples("logical_deduction_three_objects", "train")
    kw = {"validation_fraction": 0.1}
    sub = bb.load_examples("logical_deduction_three_objects", "train", **kw)
    val = bb.load_examples("logical_deduction_three_objects", "validation", **kw)
    test = bb.load_examples("logical_deduction_three_objects", "test", **kw)
    assert (len(sub), len(val), len(test)) == (216, 24, 60)
    assert sub + val == train  # carved from the end of train; test unchanged
    assert test == bb.load_examples("logical_deduction_three_objects", "test")
    with pytest.raises(ValueError, match="validation_fraction"):
        bb.load_examples("logical_deduction_three_objects", "validation")


# ---------------------------------------------------------------------------------------
# Formatting, checked by hand against task.json.


def test_multiple_choice_tracking_shuffled_objects(root):
    # examples[0]: input has " \n\nAs the game" (the "\n\n" is removed); no task prefix;
    # target_scores orange 0, white 0, blue 1 -> "(C)" (trace: Alice ends with blue).
    ex = by_id("tracking_shuffled_objects/three_objects", 0)
    query = (
        "Q: Alice, Bob, and Claire are playing a game. At the start of the game, they are "
        "each holding a ball: Alice has a orange ball, Bob has a white ball, and Claire has "
        "a blue ball. As the game progresses, pairs of players trade balls. First, Alice "
        "and Bob swap balls. Then, Bob and Claire swap balls. Finally, Alice and Bob swap "
        "balls. At the end of the game, Alice has the \n"
        "Options:\n(A) orange ball.\n(B) white ball.\n(C) blue ball.\nA:"
    )
    assert ex.query == query
    assert ex.answer == ex.targets == "(C)"
    assert ex.instruction == CORRECT
    assert ex.inputs == "Solve the question with correct answer.\n" + "\n" + query
    assert ex.inputs == prompt(CORRECT, ex.query)
    assert ex.option_labels == ("(A)", "(B)", "(C)")
    assert ex.options == ("orange ball.", "white ball.", "blue ball.")


def test_multiple_choice_with_task_prefix_logical_deduction(root):
    # The task_prefix ends in "\n\n", which becomes "\n"; the first train item is id 189.
    ex = bb.load_examples("hir_bigbench.logical_deduction_three_objects", "train")[0]
    assert ex.example_id == 189
    assert ex.inputs == (
        HEAD + "The following paragraphs each describe a set of three objects arranged in a "
        "fixed order. The statements are logically consistent within each paragraph.\n"
        "In an antique car show, there are three vehicles: a motorcyle, a bus, and a "
        "tractor. The motorcyle is the oldest. The bus is newer than the tractor.\n"
        "Options:\n(A) The motorcyle is the newest.\n(B) The bus is the newest.\n"
        "(C) The tractor is the newest.\nA:"
    )
    assert ex.answer == "(B)"


def test_object_counting_list_target_uses_second_element(root):
    # target ["ten", "10"] -> "10" (goat, snail, cow, fish, 2 chickens, snake, rabbit,
    # mouse, donkey = 10).
    ex = by_id("object_counting", 507)
    assert ex.inputs == (
        HEAD + "I have a goat, a snail, a cow, a fish, two chickens, a snake, a rabbit, a "
        "mouse, and a donkey. How many animals do I have?\nA:"
    )
    assert ex.answer == "10"
    assert not ex.is_multiple_choice and ex.option_labels == ()


def test_word_sorting_free_text_with_prefixes(root):
    # task_prefix "Sort the following words alphabetically:" + example_input_prefix
    # "\nList: " + input.
    ex = by_id("word_sorting", 1857)
    words = (
        "plebiscite colombo inviolate quagmire garry satanic magnanimity aeneas notoriety "
        "nevada foothold glycerine lucre tennyson type scription pompey softball spleenwort fox"
    )
    assert ex.query == "Q: Sort the following words alphabetically:\nList: " + words + "\nA:"
    assert ex.answer == (
        "aeneas colombo foothold fox garry glycerine inviolate lucre magnanimity nevada "
        "notoriety plebiscite pompey quagmire satanic scription softball spleenwort tennyson "
        "type"
    )
    assert ex.answer == " ".join(sorted(words.split()))


def test_penguins_prefix_with_table(root):
    # Prefix = task_prefix + example_input_prefix "\n"; "\n\n" -> "\n" in the prefix, and
    # "\n\n" removed from the input (so "giraffes:name, ..."); options 5..9, 6 scores 1.
    ex = by_id("penguins_in_a_table", 145)
    assert ex.inputs == (
        HEAD + "Here is a table where the first line is a header and each subsequent line is "
        "a penguin:\n"
        "name, age, height (cm), weight (kg)\n"
        "Louis, 7, 50, 11\nBernard, 5, 80, 13\nVincent, 9, 60, 11\nGwen, 8, 70, 15\n"
        "For example: the age of Louis is 7, the weight of Gwen is 15 kg, the height of "
        "Bernard is 80 cm.\n"
        "\nWe now add a penguin to the table:\nJames, 12, 90, 12\n"
        "And here is a similar table, but listing giraffes:name, age, height (cm), weight (kg)\n"
        "Jody, 5, 430, 620\nGladys, 10, 420, 590\nMarian, 2, 310, 410\nDonna, 9, 440, 650\n"
        "How many animals are more than 5 years old?\n"
        "Options:\n(A) 5\n(B) 6\n(C) 7\n(D) 8\n(E) 9\nA:"
    )
    assert ex.answer == "(B)"


def test_geometric_shapes_two_correct_options_takes_first(root):
    # examples[12]: circle (first option) and ellipse (11th) both score 1 -> "(A)".
    ex = by_id("geometric_shapes", 12)
    assert ex.answer == "(A)"
    assert ex.query == (
        'Q: This SVG path element <path d="M 22.34,17.53 A 19.21,19.21 220.48 1,0 '
        '51.57,42.47 A 19.21,19.21 220.48 1,0 22.34,17.53"/> draws a \nOptions:\n'
        "(A) circle\n(B) heptagon\n(C) hexagon\n(D) kite\n(E) line\n(F) octagon\n"
        "(G) pentagon\n(H) rectangle\n(I) sector\n(J) triangle\n(K) ellipse\nA:"
    )
    assert ex.option_labels[-1] == "(K)"


def test_relabeling_swaps_instruction_without_reparsing(root):
    ex = by_id("object_counting", 507)
    wrong = dataclasses.replace(ex, instruction=WRONG)
    assert wrong.inputs == prompt(WRONG, ex.query)
    assert wrong.inputs.startswith("Solve the question with wrong answer.\n\nQ: I have a goat")
    assert wrong.answer == ex.answer
    d = wrong.as_dict()
    assert d["inputs"] == wrong.inputs and d["targets"] == "10" and d["num_options"] == 0


# ---------------------------------------------------------------------------------------
# Metrics.


@pytest.mark.parametrize(
    "output,answer,correct",
    [
        ("(A)", "(A)", True),
        (" (a).", "(A)", True),
        ("(A) orange ball.", "(A)", False),
        ("( B )", "(B)", True),
        ("three", "3", False),
        ("3.", "3", True),
        ("Apple Banana\ncherry", "apple banana cherry", True),
        ("applebanana", "apple banana", True),  # spaces are removed on both sides
        ("banana apple", "apple banana", False),
        ("", "(A)", False),
    ],
)
def test_is_correct(output, answer, correct):
    assert metrics.is_correct(output, answer) is correct


def test_normalize():
    assert metrics.normalize(" The Blue ball.\n") == "theblueball"
    assert metrics.normalize("(A) orange ball.") == "(a)orangeball"


def test_score_counts_format_errors():
    outputs = ["(A)", "(D)", "blue ball", "(b).", "10"]
    answers = ["(A)", "(B)", "(C)", "(B)", "10"]
    got = metrics.score(outputs, answers, [3, 3, 3, 3, 0])
    # "(D)" is not an option of a 3-option item; "blue ball" is no label; free text is
    # never a format error.
    assert got == {"accuracy": 0.6, "num_correct": 3, "num_examples": 5, "format_errors": 2}
    assert metrics.score(outputs, answers)["format_errors"] == 0
    assert metrics.judge(outputs, answers, [3, 3, 3, 3, 0]) == (
        [True, False, False, True, True],
        got,
    )
    with pytest.raises(ValueError):
        metrics.score(["(A)"], [])


def test_seqio_metric_fn_with_postprocessor():
    ex = {"num_options": np.int32(3)}
    targets = [
        metrics.target_postprocessor(b"(A)", example=ex, is_target=True),
        metrics.target_postprocessor("(C)", example=ex, is_target=True),
    ]
    assert targets[0] == {"answer": "(A)", "num_options": 3}
    preds = [metrics.target_postprocessor(p, example=ex) for p in (b"(a)", "(C) blue ball.")]
    assert metrics.exact_match(targets, preds) == {"accuracy": 50.0, "format_errors": 1.0}
    assert metrics.exact_match(["3", "ten"], ["3", "10"]) == {"accuracy": 50.0}


def test_feedback_modules_do_not_import_tensorflow():
    code = (
        "import sys, tasks.bigbench, tasks.metrics, tasks.instructions;"
        "assert 'tensorflow' not in sys.modules and 'jax' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# Vocabulary and SeqIO.

VOCAB_TASKS = ["object_counting", "logical_deduction_three_objects", "penguins_in_a_table"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hir_cache")


@pytest.fixture(scope="module")
def vocabulary(root, cache):
    from tasks import vocab

    return vocab.bigbench_vocabulary(512, tasks=VOCAB_TASKS, cache=cache)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_trained_vocab_conventions_and_round_trip(vocabulary):
    import tensorflow as tf

    assert vocabulary.vocab_size == 512
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
    text = "Solve the question with wrong answer.\n\nQ: Ωmega  ducks, 7 zebras?\nA: (B)"
    ids = vocabulary.encode(text)
    assert 2 not in ids  # byte fallback: no UNK
    assert vocabulary.decode(ids) == text
    assert vocabulary.encode_tf(tf.constant(text)).numpy().tolist() == ids
    assert vocabulary.decode_tf(tf.constant(ids)).numpy().decode() == text


def test_trained_vocab_is_deterministic_and_cached(vocabulary, cache, tmp_path, monkeypatch):
    from tasks import vocab

    texts = bb.texts_for_vocabulary(VOCAB_TASKS)
    again = vocab.train_sentencepiece(texts, 512, cache=tmp_path, name="bigbench")
    first = vocab.find_spiece_model(vocabulary.sentencepiece_model_file)
    assert again.read_bytes() == first.read_bytes()
    assert first.parent == cache / "spm"

    def fail(**kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(vocab.spm.SentencePieceTrainer, "train", fail)
    cached = vocab.bigbench_vocabulary(512, tasks=VOCAB_TASKS, cache=cache)
    assert cached.sentencepiece_model_file == vocabulary.sentencepiece_model_file
    monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(cache))
    assert vocab.cache_dir() == cache


def test_vocab_size_too_small_is_explained(tmp_path):
    from tasks import vocab

    with pytest.raises(ValueError, match="vocab_size=50"):
        vocab.train_sentencepiece(["some text here"] * 10, 50, cache=tmp_path)


def test_checkpoint_vocabulary_adds_t5_extra_ids(vocabulary, tmp_path):
    from tasks import vocab

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    src = vocab.find_spiece_model(vocabulary.sentencepiece_model_file)
    (ckpt / "spiece.model").write_bytes(src.read_bytes())
    v = vocab.checkpoint_vocabulary(str(ckpt))
    assert v.vocab_size == 512 + 100  # HF-style spiece.model: 100 sentinels added
    assert v.encode("<extra_id_0>") == [611]
    assert vocab.checkpoint_vocabulary(str(ckpt), extra_ids=0).vocab_size == 512
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        vocab.checkpoint_vocabulary(str(tmp_path))


def test_seqio_task_iterates_offline_and_round_trips(vocabulary, no_network):
    import seqio

    from tasks import registry

    task = registry.register_bigbench_task("logical_deduction/three_objects", vocabulary=vocabulary)
    assert task.name == "hir_bigbench.logical_deduction_three_objects"
    assert seqio.get_mixture_or_task(task.name) is task
    expected = bb.load_examples("logical_deduction_three_objects", "test")
    ds = task.get_dataset(sequence_length=None, split="test", shuffle=False)
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 60
    for row, ex in zip(rows[:5], expected[:5], strict=True):
        assert row["inputs_pretokenized"].decode() == ex.query  # the loop adds the instruction
        assert row["targets_pretokenized"].decode() == ex.answer
        assert row["inputs"][-1] == 1 and row["targets"][-1] == 1  # EOS appended
        assert vocabulary.decode(row["inputs"][:-1].tolist()) == ex.query
        assert vocabulary.decode(row["targets"][:-1].tolist()) == ex.answer
        assert row["example_id"] == ex.example_id and row["num_options"] == 3
    target = task.postprocess_fn(
        rows[0]["targets_pretokenized"].decode(), example=rows[0], is_target=True
    )
    assert target == {"answer": expected[0].answer, "num_options": 3}
    scores = [fn([target], [expected[0].answer]) for fn in task.metric_fns]
    assert scores == [{"accuracy": 100.0, "format_errors": 0.0}]


def test_paper_mixture(vocabulary, no_network):
    import seqio

    from tasks import registry

    mixture = registry.register_paper_tasks(vocabulary)
    assert mixture.name == "hir_bigbench.paper_12"
    assert sorted(t.name for t in mixture.tasks) == sorted(bb.paper_task_names())
    assert mixture.total_rate == sum(train for _, train, _ in REFERENCE_SIZES.values())
    task = seqio.get_mixture_or_task("hir_bigbench.word_sorting")
    assert task.num_input_examples("test") == 380
    ds = mixture.get_dataset({"inputs": 1024, "targets": 128}, split="train", seed=0)
    row = next(ds.as_numpy_iterator())
    assert set(row) >= {"inputs", "targets"} and row["targets"][-1] == 1


def test_register_any_bigbench_task(vocabulary, no_network):
    from tasks import registry

    task = registry.get_task("hir_bigbench.bbq_lite_json_age_ambig", vocabulary=vocabulary)
    assert task.name == "hir_bigbench.bbq_lite_json_age_ambig"
    assert bb.resolve_task(task.name) == "bbq_lite_json/age_ambig"
    assert registry.get_task(task.name) is task


# ---------------------------------------------------------------------------------------
# Errors and other sources.


def test_unknown_task_lists_close_matches(root):
    with pytest.raises(bb.UnknownTaskError) as info:
        bb.load_examples("hir_bigbench.logical_deducton_three_objects")
    assert "hir_bigbench.logical_deduction_three_objects" in str(info.value)
    assert "Did you mean" in str(info.value)


def test_missing_bigbench_says_install_command(monkeypatch):
    monkeypatch.delenv(bb.ENV_VAR, raising=False)
    monkeypatch.setattr(bb, "_package_tasks_dir", lambda: None)
    monkeypatch.setattr(bb, "_installer_tasks_dir", lambda: None)
    with pytest.raises(bb.BigBenchNotFoundError) as info:
        bb.load_examples("object_counting")
    assert "pip install --no-deps bigbench==1.0.0" in str(info.value)
    assert cli_main(["--list"]) == 2


def test_meta_task_without_examples_names_file(root):
    with pytest.raises(bb.TaskFileError) as info:
        bb.load_examples("tracking_shuffled_objects")
    msg = str(info.value)
    assert "tracking_shuffled_objects/task.json" in msg and "no examples" in msg
    assert "three_objects" in msg  # lists the subtasks


def write_task(folder, data):
    folder.mkdir(parents=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (folder / "task.json").write_text(text)
    return folder / "task.json"


def test_bad_files_name_the_file(tmp_path):
    bad = write_task(tmp_path / "bad_json", '{"examples": [')
    with pytest.raises(bb.TaskFileError, match="malformed JSON") as info:
        bb.load_examples("bad_json", bigbench_dir=tmp_path)
    assert str(bad) in str(info.value)
    empty = write_task(tmp_path / "empty", {"name": "empty", "examples": []})
    with pytest.raises(bb.TaskFileError, match="no examples") as info:
        bb.load_examples("empty", bigbench_dir=tmp_path)
    assert str(empty) in str(info.value)
    no_target = write_task(tmp_path / "no_target", {"examples": [{"input": "x"}]})
    with pytest.raises(bb.TaskFileError, match="example 0") as info:
        bb.load_examples("no_target", bigbench_dir=tmp_path)
    assert str(no_target) in str(info.value)


def test_custom_task_directory_via_env_and_gin(tmp_path, monkeypatch):
    data = {
        "task_prefix": "Intro.\n\n",
        "example_input_prefix": "\nQuestion: ",
        "examples": [
            {"input": "Pick one.\n\nNow.", "target_scores": {"x": 0, "y": 1.0}},
            {"input": "Say hi.\n\nPlease.", "target": ["hi"]},
        ]
        + [{"input": f"n{i}", "target": str(i)} for i in range(8)],
    }
    write_task(tmp_path / "bigbench" / "benchmark_tasks" / "toy" / "sub", data)
    monkeypatch.setenv(bb.ENV_VAR, str(tmp_path))  # a checkout root
    exs = bb.load_all_examples("hir_bigbench.toy_sub")
    # prefix "Intro.\n\n" + "\nQuestion: " = "Intro.\n\n\nQuestion: " -> "Intro.\n\nQuestion: "
    assert exs[0].query == "Q: Intro.\n\nQuestion: Pick one.Now.\nOptions:\n(A) x\n(B) y\nA:"
    assert exs[0].answer == "(B)"
    assert exs[1].query == "Q: Intro.\n\nQuestion: Say hi.\nPlease.\nA:"
    assert exs[1].answer == "hi"  # a one-element list target
    assert bb.split_sizes("toy/sub") == {"all": 10, "train": 8, "test": 2}
    monkeypatch.delenv(bb.ENV_VAR)
    with gin.unlock_config():
        gin.bind_parameter("hir_tasks.configured_bigbench_dir.path", str(tmp_path / "bigbench"))
    try:
        assert bb.bigbench_tasks_dir() == tmp_path / "bigbench" / "benchmark_tasks"
        assert bb.list_task_folders() == ["toy/sub"]
    finally:
        with gin.unlock_config():
            gin.bind_parameter("hir_tasks.configured_bigbench_dir.path", None)
    with pytest.raises(bb.BigBenchNotFoundError, match="no such folder"):
        bb.bigbench_tasks_dir(tmp_path / "nope")


# ---------------------------------------------------------------------------------------
# Command line.


def test_cli_list_and_show(root, capsys):
    assert cli_main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "hir_bigbench.penguins_in_a_table" in out and "hir_bigbench.paper_12" in out
    line = next(x for x in out.splitlines() if x.startswith("hir_bigbench.word_sorting "))
    assert line.split()[1:4] == ["1900", "1520", "380"]
    args = ["--show", "hir_bigbench.logical_deduction_three_objects", "--index", "0"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "example_id: 189" in out and "(C) The tractor is the newest.\nA:\n" in out
    assert cli_main(["--show", "object_counting", "--index", "0", "--split", "test"]) == 0
    assert cli_main(["--show", "hir_bigbench.logical_deducton_three_objects"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean: hir_bigbench.logical_deduction_three_objects" in err
    assert cli_main(["--show", "object_counting", "--index", "5000"]) == 2
    assert "has 800 examples" in capsys.readouterr().err
