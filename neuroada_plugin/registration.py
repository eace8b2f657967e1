"""Compatibility name of :mod:`neuroada_plugin.peft_registration` (PEFT enum extension and registration)."""

from .peft_registration import ensure_peft_type, ensure_registered, register_all, register_method, registered_methods

__all__ = ["ensure_peft_type", "ensure_registered", "register_all", "register_method", "registered_methods"]
