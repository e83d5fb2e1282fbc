"""vhost-user: the wire codec (``protocol``), socket framing (``channel``) and the
back-end built on them.

Imports nothing on purpose: ``sim`` uses ``ifcvf.vhost.protocol`` without pulling
in the driver.
"""
