"""Build stage: immutable, labelled, split dataset versions and their export (entry: ``stage.run``)."""
