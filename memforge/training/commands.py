"""Sub-commands of the training jobs (``train``, ``eval``, ``ablate``); registered on import."""
