"""Offline benchmark suites: experts trained and cached, merges tuned on validation splits, reports."""

from __future__ import annotations
