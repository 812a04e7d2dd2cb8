"""Registered versions as MLflow models: ``predict`` on raw videos (``predict``), the models-from-code entry point
MLflow loads (``pyfunc_model``), and logging one (``export``)."""
