import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.tiny import make_tiny_model

    # a long context so that a chat reply can outlast a Ctrl-C
    return make_tiny_model(tmp_path_factory.mktemp("tiny-cli"), "llama",
                           max_position_embeddings=4096)
