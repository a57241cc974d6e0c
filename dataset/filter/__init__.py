"""Filter stage: detector features and versioned keep/reject rules per photo (entry: ``stage.run``)."""
