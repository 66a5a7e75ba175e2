"""The accounts service: sign-up, login (access tokens), viewer profiles, and their events."""
