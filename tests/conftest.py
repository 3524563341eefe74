# Fixtures live in plugin modules: the real services, the whole stack on top of them, and
# the production proxy (nginx) in front of a Prefect server.
pytest_plugins = ["tests.fixtures.services", "tests.fixtures.stack", "tests.fixtures.proxy"]
