"""Operator CLI for the PatchCore inspection service."""
