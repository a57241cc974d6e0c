"""One log line per training epoch per member, and the learning curves behind them.

Keras' own progress bar (``verbose=1``) writes carriage returns into Airflow task logs; training
runs with ``verbose=0`` and this callback logs instead, e.g.::

    member efficientnet_lite0 head epoch 3/25: loss 0.9120, accuracy 0.7000, val_loss 1.0210,
    val_accuracy 0.6500, 4.2 s

It also keeps every epoch's metrics and seconds (:attr:`EpochLog.curve`), which training saves
with the model (``learning_curves.json``) and the evaluation report plots.
"""
from __future__ import annotations

import logging
import math
import time

import keras

log = logging.getLogger("modeling.training")

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


class EpochLog(keras.callbacks.Callback):
    """Logs one line per epoch for ``member``'s ``stage`` ('head' or 'fine-tune')."""

    def __init__(self, member: str, stage: str, epochs: int):
        super().__init__()
        self.member, self.stage, self.epochs = member, stage, epochs
        self.curve: dict[str, list[float]] = {name: [] for name in METRICS + ("seconds",)}
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = time.monotonic() - self._started
        for name in METRICS:
            value = logs.get(name)
            finite = value is not None and math.isfinite(float(value))
            self.curve[name].append(float(value) if finite else None)  # JSON has no NaN
        self.curve["seconds"].append(round(seconds, 2))
        measured = ", ".join(f"{name} {float(logs[name]):.4f}" for name in METRICS if name in logs)
        log.info("member %s %s epoch %d/%d: %s, %.1f s", self.member, self.stage, epoch + 1,
                 self.epochs, measured, seconds)
