from horizon.data.text import VOCAB_SIZE, load_corpus, sample_batch, split, validation_batches
from horizon.data.tokenized import TokenizedText, load_tokenizer

__all__ = ["VOCAB_SIZE", "load_corpus", "sample_batch", "split", "validation_batches", "TokenizedText",
           "load_tokenizer"]
