"""The instruction strings of HIR: the one place they are defined.

The sampling prompt always uses ``CORRECT``. Relabeling a correct output uses
``CORRECT_RELABEL_RELEASED`` in the released code (which drops "the") and ``CORRECT`` in
the paper; ``WRONG`` is the same in both.
"""

CORRECT = "Solve the question with correct answer."
WRONG = "Solve the question with wrong answer."
CORRECT_RELABEL_RELEASED = "Solve question with correct answer."


def prompt(instruction: str, query: str) -> str:
    """The model input: instruction, blank line, then the query ("Q: ... \\nA:")."""
    return instruction + "\n" + "\n" + query
