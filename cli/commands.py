"""Imports every sub-command module so that it registers itself on the group."""

from f2m_ray_cli import cmd_data, cmd_encode, cmd_evaluate, cmd_export, cmd_inspect, cmd_interpolate, cmd_judge, cmd_model, cmd_phantoms, cmd_synthesize, cmd_train  # noqa: F401
