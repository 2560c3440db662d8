"""Operator tools beside the daemon: replay, record, explain, doctor, audit queries and top.

They depend on the compiler, the engine and the neutral :mod:`remedy.status`, never on the
daemon's package (:mod:`remedy.service`); tests/unit/test_rooms.py holds that line.
"""
