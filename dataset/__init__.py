"""Dataset stages: near-duplicate removal, detector-assisted filter, versioned dataset build."""
