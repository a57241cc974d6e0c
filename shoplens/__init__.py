"""shoplens core: configuration, the PostgreSQL manifest and the object store shared by all stages."""
