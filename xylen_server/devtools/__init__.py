"""Tools that drive model servers from outside, as a user would; nothing in xylen_server
imports them.

``launcher``       start and stop real ``xylen-server`` processes (demo, benchmarks, tests)
``learning_demo``  one continuous-learning cycle against a running server
``demo``           ``make demo``: servers, Predict, the ensemble, a kill -9, a learning cycle
``certs``          ``make certs``: a local CA, server and client certificates for TLS
"""
