"""dashboard: one web page that shows the bus live, served through the gateway.

The topology comes from the contract (topics/topics.yaml: producers, topics, consumers). Every
second the service samples the high watermarks of every declared topic (and its dead letters) and the
committed offsets of the consumer groups it shows, through the Kafka admin API; rates are
high-watermark deltas, lag is watermark minus committed offset (``handlers``). It tails
scaling.decisions, anomalies.detected and nodes.mount-stall, and polls Zipkin for the recent traces
of the gateway. The page (``static/``: plain HTML, JS and CSS, SVG drawn by hand, nothing from a CDN)
polls ``/v1/dashboard/state`` once a second.

No consumer group for the tail. The dashboard is a read-only view whose state lives in memory and is
rebuilt on start from the last ``DASHBOARD_BACKLOG_PER_PARTITION`` records of each partition:
- every replica must see every record (a shared group would split the partitions between replicas, and
  each page would show a different part of the bus);
- there is no work to checkpoint, so committed offsets would buy nothing;
- a group per instance would leave a new group with committed offsets in ``__consumer_offsets`` at
  every restart (pod names change), and those groups would show up as lagging consumers on this very
  page and in every lag-based alert.
So its partitions are assigned by hand (aiokafka, ``group_id=None``), nothing is ever committed, and
it does not join the KEDA lag-based scaling: it is scaled on CPU by an HPA.

Auth: the page itself is public (it holds no data, and a browser cannot send a bearer token on a
navigation). The JSON needs an access token with the ``ops:read`` scope, checked by the gateway (a
verified token) and here again (the scope): it shows the system's inner workings (group and node
names, anomaly evidence, trace ids), and polling once a second fits the per-account rate limit of
authenticated routes, not the per-address limit of the public ones. ``reelbus dashboard`` prints the
page's address with a fresh token in the URL fragment (never sent to a server nor logged).
"""
