"""Exceptions raised for bad user input (structures, files, labels)."""


class JanusInputError(ValueError):
    """A structure, model file or dataset that Janus cannot use, with the reason in the message."""
