"""Real training jobs that use the regulator (UCI Multiple Features digits, MLP encoders)."""
