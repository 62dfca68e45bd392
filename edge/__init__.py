"""The line-side agent: scores next to the camera through core/, keeps every result durably, syncs it.

See edge/README.md. Imports only core/ and serving/ (tests/test_layers.py holds it to that).
"""
