"""Data: a dataset loader returns a LabelledPool; `make_transfer_data` cuts it into tasks."""

from transferlab.data.pool import LabelledPool
from transferlab.data.splits import TaskSplits, TransferData, make_transfer_data

__all__ = ["LabelledPool", "TaskSplits", "TransferData", "make_transfer_data"]
