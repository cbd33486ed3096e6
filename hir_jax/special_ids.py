"""T5's special token ids, shared by the model (``hir_jax.model``) and the task
vocabularies (``tasks.vocab``) without either importing the other."""

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
DECODER_START_ID = PAD_ID  # T5 starts decoding from the pad id
