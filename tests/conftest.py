# Fixtures live in plugin modules: the real services, and the whole stack on top of them.
pytest_plugins = ["fixtures.services", "fixtures.stack"]
