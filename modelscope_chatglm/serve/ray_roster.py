"""Which replicas each Ray Serve deployment has, as the router in this process last saw them.

ConversationRouter (ray_routing.py) writes here each time Ray tells it the replicas; RayBackend
(ray_app.py) reads it to ask every replica for its statistics (/health, /metrics). A module of its own,
imported by both, so that the router never imports the application: Ray copies ray_routing.py by value
into each process that routes, and the copy must write to this process's real roster.
"""

# (application name, deployment name) -> ids of its running replicas
ROSTER = {}
