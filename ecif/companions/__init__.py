"""Companion methods by the same group: Flex-KD, validity-calibrated reasoning distillation, continual learning."""
