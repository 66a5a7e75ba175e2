"""The recommender: a Faust stream processor turning viewings into each profile's rows ("Because you
watched X", "Trending now"), published to ``recommendations.profiles`` and served by its own HTTP."""
