"""The tiny pipelines of tests/support/pipelines.py, saved once per session."""

import pytest
from support import pipelines


@pytest.fixture(scope="session")
def saved_pipelines(tmp_path_factory) -> dict:
    """``{name: folder}``: every tiny pipeline (``pipelines.ALL``) saved with
    ``save_pretrained``, each folder loadable with ``DiffusionPipeline.from_pretrained``."""
    root = tmp_path_factory.mktemp("pipelines")
    return {name: pipelines.save(name, root) for name in pipelines.ALL}
