"""Local development harness (services, a real Airflow stack, the demo); no stage imports it."""
