"""Packaging for the VehicleNet MindSpore Hub model package.

Metadata, dependencies, package data and the version source are all in pyproject.toml
(PEP 621); this file only lets tools that still call ``setup.py`` build the same thing.
"""
from setuptools import setup

setup()
