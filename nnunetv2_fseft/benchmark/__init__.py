"""The FSEFT protocol as a resumable grid: methods x K x seeds on one target, scored on one query set."""
