"""What the recommender reads whole: replicas of the catalog, the profiles' owners, its own co-watch
log and its published lists (``services.bus.streams.Replica``)."""
