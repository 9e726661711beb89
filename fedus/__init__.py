"""fedus: federated knowledge distillation of ultrasound foundation models.

Library only: data, models, losses, site step, evaluation, reports and CLI.
It imports nothing from Flower; `client/` and `server/` adapt it to Flower.
"""

__version__ = "0.1.0"
