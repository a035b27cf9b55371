"""Offline code: the network (architecture), its export to the service's SavedModel (export),
and the command line (`python -m models --help`).

The service never imports this package; the SavedModel is the only coupling
(app/contract.py, which this package imports).
"""
