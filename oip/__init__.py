"""Open Inference Protocol (v2) wire types: the one neutral module both sides use.

Imports only numpy and pydantic. The router (client) builds requests and parses responses with
:mod:`oip.protocol`; the cloud service validates requests and renders responses with it. Neither
side imports the other (``tests/test_layering.py``).
"""
