"""Group commit (ingest/group_commit.py): threads' writes committed together, each returning
only once its own is committed, and a bad item failing alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ingest.group_commit import GroupCommit


class Store:
    """A commit function that records what it committed, refuses groups holding a bad item, and
    says whether an item was committed by the time its write returned."""

    def __init__(self, bad: set[int] = frozenset()) -> None:
        self.bad = bad
        self.committed: list[int] = []
        self.calls: list[list[int]] = []
        self.lock = threading.Lock()

    def commit(self, items: list[int]) -> None:
        with self.lock:
            self.calls.append(list(items))
            if self.bad & set(items):
                raise ValueError(f"bad item in {items}")
            self.committed.extend(items)


def write_all(group: GroupCommit[int], store: Store, items: range, threads: int) -> dict[int, BaseException | None]:
    def one(item: int) -> BaseException | None:
        try:
            group.write(item)
        except Exception as exc:  # noqa: BLE001 (the outcome is the test's subject)
            return exc
        assert item in store.committed, f"write({item}) returned before its item was committed"
        return None

    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(items, pool.map(one, items)))


def test_concurrent_writes_are_committed_in_groups_each_once():
    store = Store()
    group = GroupCommit(store.commit, size=8, linger=0.05)
    outcomes = write_all(group, store, range(200), threads=8)
    assert all(error is None for error in outcomes.values())
    assert sorted(store.committed) == list(range(200))
    assert group.writes == 200
    assert group.commits < 100, f"200 writes from 8 threads took {group.commits} commits"
    assert max(len(call) for call in store.calls) <= 8 + 7  # a full group, and those that came while it committed


def test_a_bad_item_fails_alone_and_the_rest_of_its_group_is_committed():
    store = Store(bad={13, 77})
    group = GroupCommit(store.commit, size=8, linger=0.05)
    outcomes = write_all(group, store, range(100), threads=8)
    assert {item for item, error in outcomes.items() if error is not None} == {13, 77}
    assert "bad item in [13]" in str(outcomes[13])
    assert sorted(store.committed) == sorted(set(range(100)) - {13, 77})
    assert any(len(call) > 1 and 13 in call for call in store.calls), "13 was never in a group: nothing tested"


def test_without_linger_a_lone_writer_commits_at_once():
    store = Store()
    group = GroupCommit(store.commit, size=8, linger=0)
    for item in range(5):
        group.write(item)
    assert store.calls == [[0], [1], [2], [3], [4]]


def test_a_lone_bad_item_raises_its_own_error():
    store = Store(bad={1})
    group = GroupCommit(store.commit, size=8, linger=0.01)
    with pytest.raises(ValueError, match=r"bad item in \[1\]"):
        group.write(1)
    group.write(2)
    assert store.committed == [2]
