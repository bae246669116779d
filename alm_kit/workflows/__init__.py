"""Workflows on top of both engines: ``alm-kit cache``, ``alm-kit compare``, ALARM's ``alm-kit rephrase``."""
