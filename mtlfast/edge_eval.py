"""Per-image edge evaluation with the SEISM / BSDS conventions (a Python approximation of the MATLAB tool;
the conventions are in :mod:`mtlfast.metrics`' docstring): edge non-maximum suppression (:func:`edge_nms`),
thinning identical to ``skimage.morphology.thin`` (:func:`thin`), maximum one-to-one matching within a
distance (:func:`match_edges`) and the counts of every threshold of one image at once (:func:`edge_counts`).

numpy and scipy only, no torch: :class:`mtlfast.metrics.EdgeMeter`'s spawned worker processes import this
module alone (``import mtlfast`` imports nothing heavy), so each starts in well under a second instead of
importing torch.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

__all__ = ["edge_nms", "thin", "match_edges", "edge_counts", "edge_image_counts", "exit_with_parent"]


def _conv_tri(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable triangle filter of radius ``radius`` with symmetric padding (Dollár's convTri)."""
    from scipy.ndimage import convolve1d

    kernel = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]).astype(np.float64)
    kernel /= kernel.sum()
    return convolve1d(convolve1d(image, kernel, axis=0, mode="reflect"), kernel, axis=1, mode="reflect")


def edge_nms(edges: np.ndarray, radius: int = 1, border: int = 5, margin: float = 1.01) -> np.ndarray:
    """Non-maximum suppression of an edge-strength map (H, W) in [0, 1], following Dollár's edgesNms:
    orientation O = atan(Oyy·sign(−Oxy) / (Oxx + 1e-5)) mod π from gradients of the map smoothed by a
    radius-4 triangle filter; a pixel is zeroed when ``margin`` x its value is below the bilinearly
    interpolated value at distance 1..radius along ±(cos O, sin O); values within ``border`` pixels of the
    image border are scaled by distance / border (row and column factors multiplied; border at most half
    the image)."""
    from scipy.ndimage import map_coordinates

    e = np.asarray(edges, dtype=np.float64)
    oy, ox = np.gradient(_conv_tri(e, 4))
    oxx = np.gradient(ox, axis=1)
    oyy, oxy = np.gradient(oy)
    orient = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi)
    rows, cols = np.nonzero(e > 0)
    value = e[rows, cols] * margin
    cos, sin = np.cos(orient[rows, cols]), np.sin(orient[rows, cols])
    keep = np.ones(len(rows), dtype=bool)
    h, w = e.shape
    for d in [k for r in range(1, radius + 1) for k in (r, -r)]:
        y = np.clip(rows + d * sin, 0, h - 1.001)
        x = np.clip(cols + d * cos, 0, w - 1.001)
        keep &= value >= map_coordinates(e, [y, x], order=1, mode="nearest")
    out = np.zeros_like(e)
    out[rows[keep], cols[keep]] = e[rows[keep], cols[keep]]
    border = min(border, h // 2, w // 2)
    if border > 0:
        ramp_r = np.minimum(np.minimum(np.arange(h), np.arange(h)[::-1]) / border, 1.0)
        ramp_c = np.minimum(np.minimum(np.arange(w), np.arange(w)[::-1]) / border, 1.0)
        out *= ramp_r[:, None] * ramp_c[None, :]
    return out


def _disk_offsets(radius: float) -> np.ndarray:
    """(dy, dx) of the integer offsets with dy² + dx² <= radius² (the matching tolerance, in pixels)."""
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = dy ** 2 + dx ** 2 <= radius ** 2
    return np.stack([dy[inside], dx[inside]], 1)


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of Guo-Hall thinning as ``skimage.morphology.thin`` builds
    them (its ``_generate_thin_luts``): index = 8-neighbour code with bits E, NE, N, NW, W, SW, S, SE."""
    b = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(bool)
    g1 = sum((~b[:, i] & (b[:, i + 1] | b[:, (i + 2) % 8])).astype(int) for i in (0, 2, 4, 6)) == 1
    n1 = sum((b[:, k] | b[:, k - 1]).astype(int) for k in (1, 3, 5, 7))
    n2 = sum((b[:, k] | b[:, (k + 1) % 8]).astype(int) for k in (1, 3, 5, 7))
    g2 = np.isin(np.minimum(n1, n2), (2, 3))
    g3 = ~((b[:, 1] | b[:, 2] | ~b[:, 7]) & b[:, 0])
    g3p = ~((b[:, 5] | b[:, 6] | ~b[:, 3]) & b[:, 4])
    return g1 & g2 & g3, g1 & g2 & g3p


_THIN_LUTS = _thin_luts()
_NEIGHBOUR_WEIGHTS = np.array([1, 2, 4, 8, 16, 32, 64, 128], dtype=np.uint8)  # E NE N NW W SW S SE
_NEIGHBOUR_DIRS = np.array([(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)])
_EMPTY = np.empty(0, dtype=np.int64)


class _Thinner:
    """Exact sparse re-implementation of ``skimage.morphology.thin`` (``bwmorph(.., 'thin', Inf)``) on an
    image padded by 2 and flattened. It keeps the 8-neighbour code of every pixel up to date and, after the
    first pass, re-examines only pixels whose neighbourhood changed since the sub-iteration last looked at
    them: a pixel whose code did not change gets the same answer from the same table. The sequence of
    parallel deletions, hence the result, is the one of skimage's full-image passes."""

    def __init__(self, shape: tuple[int, int]):
        self.h, self.w = shape
        self.width = self.w + 4
        self.offsets = _NEIGHBOUR_DIRS[:, 0] * self.width + _NEIGHBOUR_DIRS[:, 1]
        self._stamp: np.ndarray | None = None
        # pixel d contributes to its neighbour q = d + o the bit of the direction of d seen from q, i.e. -o
        self.back_weights = np.array([_NEIGHBOUR_WEIGHTS[list(map(tuple, _NEIGHBOUR_DIRS)).index((-y, -x))]
                                      for y, x in _NEIGHBOUR_DIRS], dtype=np.uint8)

    def _distinct(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels`` without repeats (order kept up to which copy survives), without sorting."""
        if pixels.size < 2:
            return pixels
        if self._stamp is None:
            self._stamp = np.zeros((self.h + 4) * self.width, dtype=np.int64)
        order = np.arange(pixels.size)
        self._stamp[pixels] = order
        return pixels[self._stamp[pixels] == order]

    def flat_index(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return (ys + 2) * self.width + (xs + 2)

    def codes(self, skel: np.ndarray) -> np.ndarray:
        """Neighbour codes of every pixel (padding ring included) of a padded flat uint8 {0,1} image."""
        img = skel.reshape(self.h + 4, self.width)
        code = np.zeros_like(img)
        inner = code[1:-1, 1:-1]
        for (dy, dx), weight in zip(_NEIGHBOUR_DIRS, _NEIGHBOUR_WEIGHTS):
            inner |= img[1 + dy:img.shape[0] - 1 + dy, 1 + dx:img.shape[1] - 1 + dx] * weight
        return code.ravel()

    def remove(self, skel: np.ndarray, code: np.ndarray, pixels: np.ndarray) -> None:
        """Sets distinct foreground ``pixels`` to 0, updating the codes of their neighbours."""
        skel[pixels] = 0
        for offset, weight in zip(self.offsets, self.back_weights):
            code[pixels + offset] -= weight  # distinct targets within one direction

    def thin(self, skel: np.ndarray, code: np.ndarray, foreground: np.ndarray) -> int:
        """Thins ``skel`` in place (``code`` kept in step); ``foreground``: its pixels. Returns how many
        pixels were deleted."""
        pending = [foreground, foreground]  # pixels each sub-iteration still has to (re)examine
        deleted, sub = 0, 0
        while True:
            candidates, pending[sub] = pending[sub], _EMPTY
            if candidates.size:
                candidates = candidates[skel[candidates] != 0]
            gone = candidates[_THIN_LUTS[sub][code[candidates]]] if candidates.size else _EMPTY
            if gone.size:
                self.remove(skel, code, gone)
                deleted += gone.size
                touched = (gone[:, None] + self.offsets[None, :]).ravel()
                touched = touched[skel[touched] != 0]
                for k in (0, 1):
                    pending[k] = self._distinct(np.concatenate([pending[k], touched]))
            elif not pending[1 - sub].size:  # neither sub-iteration has a pixel left to look at
                return deleted
            sub ^= 1


def thin(image: np.ndarray) -> np.ndarray:
    """Morphological thinning of a boolean (H, W) image, identical to ``skimage.morphology.thin(image)``
    (Guo-Hall two-sub-iteration thinning until nothing changes, as MATLAB's ``bwmorph(.., 'thin', Inf)``),
    faster on sparse images."""
    image = np.asarray(image).astype(bool)
    if image.ndim != 2:
        raise ValueError(f"thin: expected a 2-D image, got shape {image.shape}")
    thinner = _Thinner(image.shape)
    skel = np.zeros((image.shape[0] + 4, image.shape[1] + 4), dtype=np.uint8)
    skel[2:-2, 2:-2] = image
    skel = skel.ravel()
    ys, xs = np.nonzero(image)
    thinner.thin(skel, thinner.codes(skel), thinner.flat_index(ys, xs))
    return skel.reshape(image.shape[0] + 4, -1)[2:-2, 2:-2].astype(bool)


def _max_matching(gt_of_edge: np.ndarray, pred_of_edge: np.ndarray, n_gt: int, n_pred: int,
                  pairs: bool = False):
    """Size of a maximum matching of the bipartite graph with edges (gt_of_edge[i], pred_of_edge[i]),
    ``gt_of_edge`` sorted ascending, every pred node 0..n_pred-1 on at least one edge. ``pairs=True``:
    (size, gt nodes, pred nodes) of the matched pairs."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    if gt_of_edge.size == 0:
        return (0, _EMPTY, _EMPTY) if pairs else 0
    # Unit-capacity flow source -> gt pixel -> pred pixel -> sink solved by Dinic's algorithm (O(E sqrt V), as
    # Hopcroft-Karp). Not scipy's maximum_bipartite_matching: its DFS takes exponential time on layered
    # graphs (scipy issue 26147), which chains of edge pixels are; it did not finish on a 375x500 map.
    # Nodes: 0 source, 1..n_gt ground truth, n_gt+1..n_gt+n_pred predictions, n_gt+n_pred+1 sink; the CSR
    # arrays are written directly (rows in node order, edge i of the input at position n_gt + i).
    sink = n_gt + n_pred + 1
    n_edges = gt_of_edge.size
    indptr = np.empty(sink + 2, dtype=np.int32)
    indptr[0], indptr[1] = 0, n_gt
    indptr[2:n_gt + 2] = n_gt + np.cumsum(np.bincount(gt_of_edge, minlength=n_gt))
    indptr[n_gt + 2:sink + 1] = n_gt + n_edges + np.arange(1, n_pred + 1)
    indptr[sink + 1] = n_gt + n_edges + n_pred
    indices = np.concatenate([np.arange(1, n_gt + 1), n_gt + 1 + pred_of_edge, np.full(n_pred, sink)])
    graph = csr_matrix((np.ones(indices.size, dtype=np.int32), indices.astype(np.int32), indptr),
                       shape=(sink + 1, sink + 1))
    result = maximum_flow(graph, 0, sink, method="dinic")
    size = int(result.flow_value)
    if not pairs:
        return size
    # the matched edges: unit flow on a ground-truth -> prediction arc
    flow = result.flow.tocsr()
    rows = np.repeat(np.arange(flow.shape[0]), np.diff(flow.indptr))
    hit = (flow.data == 1) & (rows >= 1) & (rows <= n_gt) & (flow.indices > n_gt) & (flow.indices < sink)
    return size, rows[hit].astype(np.int64) - 1, flow.indices[hit].astype(np.int64) - n_gt - 1


class _EdgeGraph:
    """Admissible pairs (ground-truth pixel, candidate prediction pixel) at distance <= ``radius`` of one
    image, built once for all thresholds. Candidates: the pixels of ``support`` within ``radius`` of some
    ground-truth pixel. The pairs are kept in both orders (by ground-truth pixel and by candidate) for the
    augmenting-path searches of :meth:`count`."""

    def __init__(self, support: np.ndarray, gt: np.ndarray, radius: float):
        h, w = gt.shape
        gy, gx = np.nonzero(gt)
        self.n_gt, self.n_cand = len(gy), 0
        self.pixels = (_EMPTY, _EMPTY)
        self.gt_of_edge = self.cand_of_edge = _EMPTY
        if self.n_gt == 0 or not support.any():
            return
        from scipy.ndimage import distance_transform_edt

        # the distance transform only prunes: the tolerance is the integer rule of _disk_offsets, so pixels up
        # to a rounding error beyond the radius are kept and left to it
        near = support & (distance_transform_edt(~gt) <= radius * (1 + 1e-9) + 1e-9)
        cy, cx = np.nonzero(near)
        if len(cy) == 0:
            return
        r = int(math.floor(radius))
        width = w + 2 * r
        index = np.full((h + 2 * r) * width, -1, dtype=np.int64)
        index[(cy + r) * width + (cx + r)] = np.arange(len(cy))
        offsets = _disk_offsets(radius)
        flat_offsets = offsets[:, 0] * width + offsets[:, 1]
        base = (gy + r) * width + (gx + r)
        gt_parts, cand_parts = [], []
        block = max(1, (1 << 22) // len(flat_offsets))  # ground-truth pixels per block: bounded memory
        for lo in range(0, self.n_gt, block):
            cand = index[base[lo:lo + block, None] + flat_offsets[None, :]]  # -1: no candidate at that offset
            g, k = np.nonzero(cand >= 0)                                      # row-major: sorted by ground truth
            gt_parts.append(g + lo)
            cand_parts.append(cand[g, k])
        gt_of_edge = np.concatenate(gt_parts)
        self.gt_of_edge, self.cand_of_edge = gt_of_edge, np.concatenate(cand_parts)
        self.pixels, self.n_cand = (cy, cx), len(cy)
        self.gt_ptr = np.concatenate([[0], np.cumsum(np.bincount(gt_of_edge, minlength=self.n_gt))])
        by_cand = np.argsort(self.cand_of_edge, kind="stable")
        self.gt_by_cand = gt_of_edge[by_cand]
        self.cand_ptr = np.concatenate([[0], np.cumsum(np.bincount(self.cand_of_edge, minlength=self.n_cand))])

    def count(self, selected: np.ndarray, warm: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
        """Maximum matching between the ground truth and the candidates with ``selected[i]`` true:
        (size, (ground-truth ids, candidate ids) of its pairs).

        ``warm``: the pairs of a matching for another selection (the neighbouring threshold). Its pairs
        whose candidate is still selected form a matching here, which is grown by augmenting paths
        (:func:`_augment`) until a search finds none: then it is maximum (Berge's theorem). Without
        ``warm``, or when the augmentation takes too many phases, the max-flow solver runs."""
        if self.gt_of_edge.size == 0 or not selected.any():
            return 0, (_EMPTY, _EMPTY)
        if warm is not None:
            wg, wc = warm
            still = selected[wc]
            wg, wc = wg[still], wc[still]
            mate_gt = np.full(self.n_gt, -1, dtype=np.int64)
            mate_cand = np.full(self.n_cand, -1, dtype=np.int64)
            mate_gt[wg], mate_cand[wc] = wc, wg
            all_gt = np.ones(self.n_gt, dtype=bool)
            # search from the side with fewer unmatched nodes
            if self.n_gt <= int(np.count_nonzero(selected)):
                done = _augment(self.gt_ptr, self.cand_of_edge, mate_gt, mate_cand, all_gt, selected)
            else:
                done = _augment(self.cand_ptr, self.gt_by_cand, mate_cand, mate_gt, selected, all_gt)
            if done:
                g = np.flatnonzero(mate_gt >= 0)
                return len(g), (g, mate_gt[g])
        keep = selected[self.cand_of_edge]
        gt_of_edge, cand_of_edge = self.gt_of_edge[keep], self.cand_of_edge[keep]
        if gt_of_edge.size == 0:
            return 0, (_EMPTY, _EMPTY)
        used = np.zeros(self.n_cand, dtype=bool)
        used[cand_of_edge] = True
        renumber = np.cumsum(used) - 1
        size, g, p = _max_matching(gt_of_edge, renumber[cand_of_edge], self.n_gt, int(renumber[-1]) + 1,
                                   pairs=True)
        return size, (g, np.flatnonzero(used)[p])


def _augment(ptr: np.ndarray, neighbours: np.ndarray, mate_a: np.ndarray, mate_b: np.ndarray,
             valid_a: np.ndarray, valid_b: np.ndarray, max_phases: int = 64) -> bool:
    """Grows a matching of a bipartite graph A-B to maximum by shortest augmenting paths, in phases as
    Hopcroft-Karp: a breadth-first search from every unmatched node of A (``valid_a``) along alternating
    paths, one layer at a time in numpy, then vertex-disjoint paths of its search forest are flipped.
    Node a of A has the neighbours ``neighbours[ptr[a]:ptr[a + 1]]`` in B, of which those with ``valid_b``
    count; ``mate_a``/``mate_b``: partner or -1, updated in place. Returns True once a search finds no
    augmenting path (the matching is then maximum, Berge's theorem), False after ``max_phases`` phases."""
    for _ in range(max_phases):
        parent = np.full(len(mate_b), -1, dtype=np.int64)  # the A node a B node was first reached from
        seen_a = np.zeros(len(mate_a), dtype=bool)
        frontier = np.flatnonzero(valid_a & (mate_a < 0))
        seen_a[frontier] = True
        free = _EMPTY
        while frontier.size:
            starts = ptr[frontier]
            lens = ptr[frontier + 1] - starts
            total = int(lens.sum())
            if total == 0:
                break
            pos = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(total)
            a, b = np.repeat(frontier, lens), neighbours[pos]
            new = valid_b[b] & (parent[b] < 0)
            a, b = a[new], b[new]
            parent[b] = a
            first = parent[b] == a  # one entry per B node (the pairs (a, b) are distinct)
            a, b = a[first], b[first]
            unmatched = mate_b[b] < 0
            if unmatched.any():
                free = b[unmatched]
                break
            frontier = mate_b[b]
            frontier = frontier[~seen_a[frontier]]
            seen_a[frontier] = True
        if free.size == 0:
            return True
        taken = np.zeros(len(mate_a), dtype=bool)
        for b in free.tolist():  # flip vertex-disjoint paths b <- a (<- mate b' <- a' ...) of the forest
            path = []
            while True:
                a = int(parent[b])
                if taken[a]:
                    path = None
                    break
                path.append((a, b))
                if mate_a[a] < 0:
                    break
                b = int(mate_a[a])
            for a, b in path or ():
                taken[a] = True
                mate_a[a], mate_b[b] = b, a
    return False


def match_edges(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
    """Number of matched pairs between the pixels of two boolean (H, W) edge maps: a maximum one-to-one
    matching of predicted to ground-truth pixels at Euclidean distance <= ``max_dist`` pixels
    (dy² + dx² <= max_dist²)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    graph = _EdgeGraph(pred, gt, max_dist)
    return graph.count(np.ones(graph.n_cand, dtype=bool))[0]


def edge_counts(prob: np.ndarray, gt: np.ndarray, max_dist: float, thresholds: Sequence[float]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold t of one image: (matched, n_pred) where n_pred counts the pixels of
    ``thin(prob >= t)`` and matched is the size of their maximum matching to ``gt`` at distance <=
    ``max_dist`` pixels (:func:`match_edges`). The same numbers as that per-threshold loop, with the
    per-image work shared: the set ``prob >= t`` and its neighbour codes are updated only where pixels leave
    it as t increases, thinning is sparse (:class:`_Thinner`), the candidate pairs are listed once, and each
    threshold's maximum matching starts from its neighbour's (one max-flow solve per image)."""
    prob = np.asarray(prob, dtype=np.float64)
    gt = np.asarray(gt, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    matched = np.zeros(len(thresholds), dtype=np.int64)
    n_pred = np.zeros(len(thresholds), dtype=np.int64)
    if len(thresholds) == 0:
        return matched, n_pred
    order_t = np.argsort(thresholds, kind="stable")
    lowest = thresholds[order_t[0]]
    ys, xs = np.nonzero(prob >= lowest)
    if len(ys) == 0:
        return matched, n_pred
    thinner = _Thinner(prob.shape)
    values = prob[ys, xs]
    by_value = np.argsort(values, kind="stable")
    sorted_values = values[by_value]
    flat = thinner.flat_index(ys, xs)[by_value]        # pixels of prob >= lowest, by increasing value
    base = np.zeros((prob.shape[0] + 4) * thinner.width, dtype=np.uint8)
    base[flat] = 1
    base_code = thinner.codes(base)
    graph = _EdgeGraph(prob >= lowest, gt, max_dist)
    cand_flat = thinner.flat_index(*graph.pixels)
    # pass 1, increasing thresholds: thin each distinct set prob >= t; keep its candidates and pixel count
    selections: list[tuple[np.ndarray | None, int]] = []   # per visited threshold, in increasing order
    start, current = 0, None
    for k in order_t:
        first = int(np.searchsorted(sorted_values, thresholds[k], side="left"))  # flat[first:]: prob >= t
        if first > start:
            thinner.remove(base, base_code, flat[start:first])
            start, current = first, None
        if current is None:  # the set changed (or first visit)
            skel, code = base.copy(), base_code.copy()
            deleted = thinner.thin(skel, code, flat[start:])
            current = (skel[cand_flat] != 0 if graph.gt_of_edge.size else None, len(flat) - start - deleted)
        selections.append(current)
        n_pred[k] = current[1]
    # pass 2, matching: solved once by max-flow about where the F-measure peaks (the selected candidates
    # about as many as the reachable ground truth), then warm-started towards both ends: upwards the sets
    # shrink and the matched predictions that remain stay matched, downwards they grow and the matching stays
    # valid; a few augmenting paths restore a maximum matching (_EdgeGraph.count).
    if graph.gt_of_edge.size:
        reachable_gt = len(np.unique(graph.gt_of_edge))
        sizes = [int(sel.sum()) for sel, _ in selections]
        pivot = next((i for i, size in enumerate(sizes) if size <= reachable_gt), len(sizes) - 1)
        counts: dict[int, tuple[int, tuple]] = {}
        counts[pivot] = graph.count(selections[pivot][0])
        for step in (1, -1):
            i = pivot + step
            while 0 <= i < len(selections):
                if selections[i] is selections[i - step]:
                    counts[i] = counts[i - step]
                else:
                    counts[i] = graph.count(selections[i][0], counts[i - step][1])
                i += step
        for i, k in enumerate(order_t):
            matched[k] = counts[i][0]
    return matched, n_pred


def exit_with_parent(parent: int) -> None:
    """Worker initializer: the worker ends itself once the process that started it is gone (killed by
    SIGKILL or the OOM killer, the pool's own shutdown never comes; the worker would wait for jobs forever)."""
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def edge_image_counts(prob: np.ndarray, lab: np.ndarray, max_dist: float, thresholds: np.ndarray, nms: bool,
                      ignore_index: int) -> np.ndarray:
    """(3, len(thresholds)) int64 counts of one image (matched, predicted, ground-truth edge pixels): the work of
    :class:`mtlfast.metrics.EdgeMeter` per image; prob (H, W) in [0, 1], lab (H, W) {0, 1} with
    ``ignore_index`` on padding; ``max_dist`` a fraction of the diagonal of the non-ignored pixels' box."""
    counts = np.zeros((3, len(thresholds)), dtype=np.int64)
    valid = lab != ignore_index
    if not valid.any():
        return counts
    ys, xs = np.nonzero(valid)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    prob, valid, gt = prob[box], valid[box], lab[box] == 1
    prob = np.where(valid, prob, 0.0)
    if nms:
        prob = edge_nms(prob)
    counts[0], counts[1] = edge_counts(prob, gt, max_dist * math.hypot(*prob.shape), thresholds)
    counts[2] = int(gt.sum())
    return counts
