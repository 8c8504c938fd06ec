"""Exports of features and matches to other tools."""
