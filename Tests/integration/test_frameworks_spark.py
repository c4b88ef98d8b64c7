"""Spark MLlib and Hadoop SequenceFiles on modelfs (issue #5), in their own file (marker `spark`):
each phase starts a JVM (pyspark local mode, Java 17), so these are the slowest framework tests.
The phases are test_frameworks_matrix.py's `spark` case: model.save, write().overwrite().save(),
saveAsSequenceFile on file:// paths under the mount; then load and sequenceFile, compared bit for bit."""
from __future__ import annotations

import os
import shutil

import pytest

from test_cluster import etcd, make_nodes  # noqa: F401  (fixtures)
from test_frameworks_matrix import record_times, run_case

pytestmark = [pytest.mark.spark,
              pytest.mark.skipif(shutil.which("java") is None, reason="no java: run scripts/install-framework-deps.sh")]


def test_spark_on_one_node(mnt, tmp_path):
    d = mnt.path("spark")
    d.mkdir()
    times = run_case("spark", [d, d], between=lambda i: mnt.remount(), scratch=tmp_path)
    local = None
    if os.environ.get("MODELFS_COMPAT_TIMES"):
        ld = tmp_path / "local"
        ld.mkdir()
        local = run_case("spark", [ld, ld], scratch=tmp_path)
    record_times("spark", "one node", times, local)


def test_spark_saved_on_one_node_loaded_on_another(make_nodes, tmp_path):
    a, b = make_nodes(2, replicas=2, ack=1)
    (a / "spark").mkdir()
    times = run_case("spark", [a / "spark", b / "spark"], scratch=tmp_path)
    record_times("spark", "across nodes", times, None)
