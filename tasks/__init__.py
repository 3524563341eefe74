"""Steps: the built-ins (normalize, enrich, the records row) and the team's own, plain functions.

A step needs no Prefect: ingest/steps.py explains the rules, flows/steps.py how steps
become task runs.
"""

from ingest.steps import Reject

# The name steps used before Reject existed: the same exception.
RecordRejected = Reject
