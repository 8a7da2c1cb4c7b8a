"""What producers need to enqueue forecasts; torch-free (the worker package holds the task body)."""

from tasks.app import app
from tasks.routing import FORECAST_TASK, queue_for_model

__all__ = ["FORECAST_TASK", "app", "queue_for_model"]
