"""Placeholder: the Model class lands here."""


class Model:
    """A validated ConvNet: spec plus weights."""
