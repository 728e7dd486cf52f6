// Splitting the concatenated elements of all segments between workers.
//
// offs is the exclusive prefix sum of the segment sizes (nseg + 1 entries,
// offs[0] = 0, offs[nseg] = total). Worker k of T owns the global element range
// [worker_begin(k), worker_begin(k + 1)). The ideal split total*k/T is rounded
// down to a multiple of 64 elements counted from the start of the segment it
// falls in, so every boundary is either a segment boundary or a cache-line
// multiple inside a segment (segments start 64-byte aligned). 64-bit throughout:
// totals beyond 2^31 elements are ordinary.
#pragma once

#include <cstdint>

#include "fusedwd/common.h"

FUSEDWD_NS_BEGIN

constexpr int64_t kPartitionQuantum = 64;  // elements

// The segment holding global element i (0 <= i < total): the last s with
// offs[s] <= i, which skips zero-length segments.
FUSEDWD_HD inline int64_t segment_of(const int64_t* offs, int64_t nseg, int64_t i) {
  int64_t lo = 0;
  int64_t hi = nseg;  // invariant: offs[lo] <= i < offs[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offs[mid] <= i) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// First global element of worker k (k == nworkers gives total).
FUSEDWD_HD inline int64_t worker_begin(const int64_t* offs, int64_t nseg, int64_t k,
                                       int64_t nworkers) {
  const int64_t total = offs[nseg];
  if (k <= 0 || total == 0) return 0;
  if (k >= nworkers) return total;
  // total*k/nworkers without the 64-bit overflow of total*k
  const int64_t ideal = (total / nworkers) * k + (total % nworkers) * k / nworkers;
  const int64_t s = segment_of(offs, nseg, ideal);
  const int64_t local = ideal - offs[s];
  return offs[s] + (local - local % kPartitionQuantum);
}

FUSEDWD_NS_END
