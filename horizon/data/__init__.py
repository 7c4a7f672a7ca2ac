from horizon.data.text import VOCAB_SIZE, load_corpus, sample_batch, split, validation_batches

__all__ = ["VOCAB_SIZE", "load_corpus", "sample_batch", "split", "validation_batches"]
