// Launch geometry of the CUDA step kernels: which block updates which
// elements. Host + device, so that the CUDA kernels and the host-side tests
// (fusedwd._C_cuda.block_chunks, thread_elements) run the same arithmetic.
//
// Work is cut into chunks of kCudaThreads vectors of 16 bytes, counted from
// the start of each segment, so every chunk lies in one segment and starts
// 16-byte aligned whenever the segment's buffers do. Chunks are numbered in
// segment order and dealt round robin: block b of a grid of G updates global
// chunks b, b + G, b + 2G, ... (a persistent grid-stride loop). A block finds
// the segment of each of its chunks in a tile of kCudaThreads segments whose
// chunk prefix sums it has just computed (segment_of over the tile). 64-bit
// throughout: element and chunk counts beyond 2^31 are ordinary.
#pragma once

#include <cstdint>

#include "fusedwd/common.h"
#include "fusedwd/partition.h"

FUSEDWD_NS_BEGIN

constexpr int kCudaThreads = 256;     // threads per block, and segments per table tile
constexpr int kCudaVectorBytes = 16;  // one 128-bit load or store per thread and buffer
// Resident blocks per SM the grid is sized for: 1024 threads keep 64 KB of loads
// in flight per SM for AdamW fp32, about 4x what H100's bandwidth-latency product
// asks for, while every block also scans the segment table (see docs/backends.md).
constexpr int kCudaBlocksPerSm = 4;

// Elements per 16-byte vector: 4 fp32, 8 fp16/bf16, 2 fp64.
FUSEDWD_HD constexpr int64_t vector_elems(int64_t elem_size) { return kCudaVectorBytes / elem_size; }

// Elements per chunk: one vector per thread of a block.
FUSEDWD_HD constexpr int64_t chunk_elems(int64_t elem_size) {
  return kCudaThreads * vector_elems(elem_size);
}

// Chunks of a segment of n elements; the last one may be partial.
FUSEDWD_HD inline int64_t chunks_of(int64_t n, int64_t chunk) {
  return n / chunk + (n % chunk != 0 ? 1 : 0);
}

// The first chunk >= begin dealt to block `block` of `grid` (chunk % grid == block).
FUSEDWD_HD inline int64_t first_owned_chunk(int64_t begin, int64_t block, int64_t grid) {
  const int64_t r = begin % grid;
  return begin - r + block + (block < r ? grid : 0);
}

// Calls f(i, j) for each chunk of a tile dealt to `block`: i the segment's index
// in the tile, j the chunk's index in its segment. starts holds count + 1 chunk
// prefix sums (starts[i] the first global chunk of segment i; starts[count] one
// past the tile's last chunk); segment_of skips empty segments.
template <typename F>
FUSEDWD_HD inline void for_each_owned_chunk(const int64_t* starts, int64_t count, int64_t block,
                                            int64_t grid, F&& f) {
  const int64_t end = starts[count];
  for (int64_t c = first_owned_chunk(starts[0], block, grid); c < end; c += grid) {
    const int64_t i = segment_of(starts, count, c);
    f(i, c - starts[i]);
  }
}

// Elements [begin, end) of one chunk of a segment of n elements.
struct ChunkRange {
  int64_t begin;
  int64_t end;
};

FUSEDWD_HD inline ChunkRange chunk_range(int64_t n, int64_t chunk, int64_t j) {
  const int64_t begin = j * chunk;
  return {begin, n - begin < chunk ? n : begin + chunk};
}

// Vector path (every buffer of the segment 16-byte aligned): thread tid owns the
// elements [begin, end) of its vector, begin a multiple of vec from the segment's
// start; end - begin < vec only in the segment's last vector, done element by element.
FUSEDWD_HD inline ChunkRange thread_vector(ChunkRange r, int tid, int64_t vec) {
  const int64_t begin = r.begin + tid * vec;
  const int64_t end = r.end - begin < vec ? r.end : begin + vec;
  return {begin, end < begin ? begin : end};
}

// Scalar path (a misaligned buffer): thread tid's k-th element (k < vec); the
// threads of a warp touch consecutive elements, so accesses stay coalesced.
FUSEDWD_HD inline int64_t thread_scalar(ChunkRange r, int tid, int64_t k) {
  return r.begin + tid + k * kCudaThreads;
}

// Whether an address (of a segment's first element) allows 16-byte vector access.
FUSEDWD_HD inline bool vector_aligned(uint64_t address) {
  return address % kCudaVectorBytes == 0;
}

// The persistent grid: kCudaBlocksPerSm blocks per SM, fewer if the kernel's
// occupancy allows fewer, at least one.
FUSEDWD_HD inline int64_t persistent_grid(int64_t sm_count, int64_t max_blocks_per_sm) {
  const int64_t per_sm = max_blocks_per_sm < kCudaBlocksPerSm ? max_blocks_per_sm : kCudaBlocksPerSm;
  const int64_t grid = sm_count * per_sm;
  return grid < 1 ? 1 : grid;
}

FUSEDWD_NS_END
