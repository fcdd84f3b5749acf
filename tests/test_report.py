"""The placement report on its own: every shown time belongs to its row, unmeasured values print as
unmeasured, and the rows plus glue add up to the profiled total."""

from mixq.backends import LayerPlacement, LayerTime
from mixq.report import PlacementReport, group_times

NO_INT8 = "asked int8, runs float (ORT found no int8 kernel for this Q/DQ pattern)"
ROWS = [
    LayerPlacement("conv1", "Conv2d", "int8", "int8", ("QLinearConv",), 1),
    LayerPlacement("relu1", "ReLU", "int8", "fused", (), 1, "no kernel of its own"),
    LayerPlacement("fc1", "Linear", "int8", "fp32", ("Gemm",), 0, NO_INT8),
    LayerPlacement("pool1", "MaxPool2d", "fp32", "fp32", ("MaxPool",), 0),
]
HEAD = [
    "| layer | op | requested | runs as | kernels | unfused Q/DQ | time us | float us |",
    "|---|---|---|---|---|---|---|---|",
]
LEGEND = "time us: the row's kernels only; glue is the time outside them (Q/DQ, layout, flatten, softmax)"
MISMATCH = f"WARNING: fc1 asked for int8 but runs as fp32: {NO_INT8}"


def test_without_times_there_are_no_time_columns_or_totals():
    report = PlacementReport("onnxruntime", ROWS, glue_qdq=3)
    assert str(report).splitlines() == [
        "placement on onnxruntime",
        "| layer | op | requested | runs as | kernels | unfused Q/DQ |",
        "|---|---|---|---|---|---|",
        "| conv1 | Conv2d | int8 | int8 | QLinearConv | 1 |",
        "| relu1 | ReLU | int8 | fused | - | 1 |",
        "| fc1 | Linear | int8 | fp32 | Gemm | 0 |",
        "| pool1 | MaxPool2d | fp32 | fp32 | MaxPool | 0 |",
        "unfused Q/DQ nodes: 2 in the layers above, 3 outside any layer",
        MISMATCH,
    ]
    assert report.slower_than_float == []


def test_times_without_float_times_print_float_as_not_measured():
    # As `mixq report --profile-batch` builds it: no groups, no float engine. relu1 has no kernel of its own,
    # so a time profiled under its name is not its own: it shows "fused" and the time counts as glue.
    times = {"conv1": 100.0, "relu1": 50.0, "fc1": 20.0, "pool1": 10.0, "(glue)": 30.0}
    report = PlacementReport("onnxruntime", ROWS, times=times, batch=8)
    assert str(report).splitlines() == [
        "placement on onnxruntime (times: batch 8)",
        *HEAD,
        "| conv1 | Conv2d | int8 | int8 | QLinearConv | 1 | 100.0 | - |",
        "| relu1 | ReLU | int8 | fused | - | 1 | fused | - |",
        "| fc1 | Linear | int8 | fp32 | Gemm | 0 | 20.0 | - |",
        "| pool1 | MaxPool2d | fp32 | fp32 | MaxPool | 0 | 10.0 | - |",
        "unfused Q/DQ nodes: 2 in the layers above; their time is under glue",
        LEGEND,
        "glue: 80.0 us, float not measured",
        "total kernel time: 210.0 us, float engine not measured",
        MISMATCH,
    ]
    shown = report.row_times(times)
    assert shown == {"conv1": 100.0, "fc1": 20.0, "pool1": 10.0}
    assert sum(shown.values()) + report.glue(times) == report.total(times) == sum(times.values())
    assert report.slower_than_float == []  # nothing to compare with: no slowness warning


def test_fused_rows_show_their_leader_and_slowness_is_warned_only_where_both_are_measured():
    times = {"conv1": 300.0, "fc1": 40.0, "pool1": 10.0, "(glue)": 25.0}
    float_times = {"conv1": 100.0, "fc1": 10.0, "(glue)": 5.0}  # pool1: no kernel of its own in float
    report = PlacementReport(
        "onnxruntime", ROWS, times, float_times, batch=4, groups={"conv1": ["conv1", "relu1"]}, glue_qdq=0
    )
    assert str(report).splitlines() == [
        "placement on onnxruntime (times: batch 4)",
        *HEAD,
        "| conv1 | Conv2d | int8 | int8 | QLinearConv | 1 | 300.0 | 100.0 |",
        "| relu1 | ReLU | int8 | fused | - | 1 | in conv1 | in conv1 |",
        "| fc1 | Linear | int8 | fp32 | Gemm | 0 | 40.0 | 10.0 |",
        "| pool1 | MaxPool2d | fp32 | fp32 | MaxPool | 0 | 10.0 | fused |",
        "unfused Q/DQ nodes: 2 in the layers above, 0 outside any layer; their time is under glue",
        LEGEND,
        "glue: 25.0 us, float 5.0 us",
        "total kernel time: 375.0 us, float engine 115.0 us",
        MISMATCH,
        # fc1 is slower too, but it runs as fp32: only int8 rows get the int8-vs-float warning.
        "WARNING: conv1 is slower in int8 (300.0 us) than in float (100.0 us) on onnxruntime; "
        "consider leaving it out of the config",
    ]


def test_float_times_alone_leave_this_engine_unmeasured():
    report = PlacementReport("onnxruntime", ROWS[:1], float_times={"conv1": 5.0})
    lines = str(report).splitlines()
    assert lines[3] == "| conv1 | Conv2d | int8 | int8 | QLinearConv | 1 | - | 5.0 |"
    assert lines[-2:] == ["glue: not measured, float 0.0 us", "total kernel time: not measured, float engine 5.0 us"]
    assert report.slower_than_float == []


def test_group_times_keep_every_microsecond():
    rows = [
        LayerTime("conv1", 10.0, ("QLinearConv",)),
        LayerTime("relu1", 2.0, ("Relu",)),
        LayerTime("fc1", 3.0, ("QGemm",)),
        LayerTime("(glue)", 4.0, ("QuantizeLinear",)),
        LayerTime("elsewhere", 1.0),  # a name in no group still counts
    ]
    out = group_times(rows, {"conv1": ["conv1", "relu1"], "fc1": ["fc1"]})
    assert out == {"conv1": 12.0, "fc1": 3.0, "(glue)": 4.0, "elsewhere": 1.0}
    assert sum(out.values()) == sum(r.microseconds for r in rows)


def test_a_layer_outside_the_config_is_not_advised_out_of_it():
    """A pool the config never named, run int8 by the backend between int8 layers and slower than float: the
    warning says so, without advising to leave it out of a config it is not in."""
    rows = [LayerPlacement("pool1", "MaxPool2d", "fp32", "int8", ("NhwcMaxPool",), 0)]
    report = PlacementReport("onnxruntime", rows, {"pool1": 30.0}, {"pool1": 10.0}, batch=8)
    assert report.slower_than_float == ["pool1"]
    warning = str(report).splitlines()[-1]
    assert warning == (
        "WARNING: pool1 is slower in int8 (30.0 us) than in float (10.0 us) on onnxruntime; it is not in the "
        "config: onnxruntime runs it on the int8 tensors of its neighbours"
    )
