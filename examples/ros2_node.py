"""The robot loop of `robot_loop.py` inside a ROS 2 node (rclpy).

NOT RUN HERE: the development machines have no ROS 2. It needs a ROS 2 distribution (Humble or
newer) with `rclpy`, `sensor_msgs` and `std_msgs`, and joulecap installed in the same Python
environment. The test suite only checks that it compiles and that it reuses `PerceptionLoop`
unchanged; the loop itself is tested through `robot_loop.py`.

    source /opt/ros/humble/setup.bash
    python examples/ros2_node.py --ros-args -p camera_topic:=/camera/image_raw -p hz:=2.0

Subscribes to an RGB8 `sensor_msgs/Image` topic, keeps only the newest frame, and at a fixed rate
asks the VLM about it under a joule budget scaled by the battery (between the runtime's stated
minimum and the predicted cost of a whole answer, derived from the first frame as in
`robot_loop.py`); publishes the answer on `~/answer` and the step's energy (joules) on
`~/energy_j`. The model runs on a worker thread of
the joulecap `Runtime`, so the ROS executor is never blocked by inference.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import rclpy
from rclpy.node import Node
from sensor_msgs.msg import Image as ImageMsg
from std_msgs.msg import Float64, String

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robot_loop import Battery, PerceptionLoop, derive_budgets

from joulecap.runtime.config import JoulecapConfig
from joulecap.runtime.runtime import Runtime


class JoulecapPerceptionNode(Node):  # type: ignore[misc]
    """ROS 2 wrapper around `PerceptionLoop`: camera in, answer and energy out."""

    def __init__(self) -> None:
        super().__init__("joulecap_perception")
        topic = self.declare_parameter("camera_topic", "/camera/image_raw").value
        hz = float(self.declare_parameter("hz", 2.0).value)
        model = self.declare_parameter("model", "").value or None
        battery_j = float(self.declare_parameter("battery_j", 200.0).value)
        base = JoulecapConfig()
        self.runtime = Runtime(replace(base, engine=replace(base.engine, model=model)))
        self.battery = Battery(battery_j, battery_j)
        self.loop: PerceptionLoop | None = None  # budgets are derived from the first frame
        self.answer_pub = self.create_publisher(String, "~/answer", 10)
        self.energy_pub = self.create_publisher(Float64, "~/energy_j", 10)
        self.create_subscription(ImageMsg, topic, self._on_image, 1)
        self.create_timer(1.0 / hz, self._tick)
        self._frame: np.ndarray | None = None
        self._busy = threading.Lock()
        self._step = 0

    def _on_image(self, msg: ImageMsg) -> None:
        if msg.encoding != "rgb8":
            self.get_logger().warning(f"skipping {msg.encoding} frame; publish rgb8")
            return
        rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(msg.height, msg.step)
        self._frame = rows[:, : msg.width * 3].reshape(msg.height, msg.width, 3).copy()

    def _tick(self) -> None:
        frame = self._frame
        if frame is None or not self._busy.acquire(blocking=False):
            return  # no frame yet, or the previous step still runs: drop this tick
        self._step += 1
        threading.Thread(target=self._run, args=(self._step, frame), daemon=True).start()

    def _run(self, index: int, frame: np.ndarray) -> None:
        try:
            if self.loop is None:
                floor_j, full_j, _ = derive_budgets(self.runtime, frame)
                self.loop = PerceptionLoop(self.runtime, self.battery, floor_j=floor_j, full_j=full_j)
            report = self.loop.step(index, frame)
            self.answer_pub.publish(String(data=report.answer))
            self.energy_pub.publish(Float64(data=report.energy_j))
        finally:
            self._busy.release()

    def destroy_node(self) -> None:
        """Close the runtime (finishing its queued step), then the node."""
        self.runtime.close()
        super().destroy_node()


def main() -> None:
    rclpy.init()
    node = JoulecapPerceptionNode()
    try:
        rclpy.spin(node)
    finally:
        node.destroy_node()
        rclpy.shutdown()


if __name__ == "__main__":
    main()
