import pytest


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer (trained on stdlib source) with a chat template."""
    from tests.tiny import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("bpe-tok"))
