"""Integrations of ted_stream with training frameworks; each imports its framework only when used.

``ted_stream.integrations.hf``: the Hugging Face ``Trainer`` (extra ``ted_stream[hf]``).
"""
