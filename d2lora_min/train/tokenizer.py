"""Byte-level BPE tokenizer, trained with the `tokenizers` library on the pretraining corpus.

Byte-level means any UTF-8 text can be encoded (no unknown tokens); BPE merges the most frequent pairs
until the vocabulary is full, so the synthetic world's names and words mostly become single tokens.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # separates documents; also the padding token in evaluation batches


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path):
    return Tokenizer.from_file(str(path))
