; One q4_K row against q8_K-style activations (AVX-512 VNNI). Per super-block of 256 weights
; (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles), w =
; d * sc[s] * q - dmin * m[s] for sub-block s of 32. The activation block is int8 codes xq
; (scale dx) stored in nibble order (sub-blocks 0 2 1 3 4 6 5 7: the low nibbles of the
; first 64 code bytes are sub-blocks 0 and 2, their high nibbles 1 and 3, ...), with its
; per-sub-block code sums bs (i32, natural order). Each vpdpbusd gives 16 i32 lanes, lanes
; 0-7 from one sub-block and 8-15 from another; they are multiplied by their 6-bit scales
; (integers, exact), summed, converted once per super-block and scaled by d * dx. The min
; term sums m[s] * bs[s] (exact) times dmin * dx in 8 float lanes.
; `PREFETCH(%ptr: offsets)` lines are expanded by cpu_gguf._expand_prefetch before parsing.

define float @mistralpy_q4k_row(i64 %rowa, i64 %xqa, i64 %dxa, i64 %bsa, i64 %nb) {
entry:
  %row = inttoptr i64 %rowa to ptr
  %xq = inttoptr i64 %xqa to ptr
  %dx = inttoptr i64 %dxa to ptr
  %bs = inttoptr i64 %bsa to ptr
  br label %loop
loop:
  %b = phi i64 [0, %entry], [%b1, %loop]
  %acc = phi <16 x float> [zeroinitializer, %entry], [%acc1, %loop]
  %accm = phi <8 x float> [zeroinitializer, %entry], [%accm1, %loop]
  %off = mul i64 %b, 144
  %p = getelementptr i8, ptr %row, i64 %off
PREFETCH(%p: 0 64 128)
  %dh = load half, ptr %p, align 1
  %d = fpext half %dh to float
  %pm = getelementptr i8, ptr %p, i64 2
  %dmh = load half, ptr %pm, align 1
  %dmin = fpext half %dmh to float
  %p4 = getelementptr i8, ptr %p, i64 4
  %u0 = load i32, ptr %p4, align 1
  %p8 = getelementptr i8, ptr %p, i64 8
  %u1 = load i32, ptr %p8, align 1
  %p12 = getelementptr i8, ptr %p, i64 12
  %u2 = load i32, ptr %p12, align 1
  %sclo = and i32 %u0, 1061109567
  %mlo = and i32 %u1, 1061109567
  %u2lo = and i32 %u2, 252645135
  %u0s = lshr i32 %u0, 2
  %u0h = and i32 %u0s, 808464432
  %schi = or i32 %u2lo, %u0h
  %u2s = lshr i32 %u2, 4
  %u2hi = and i32 %u2s, 252645135
  %u1s = lshr i32 %u1, 2
  %u1h = and i32 %u1s, 808464432
  %mhi = or i32 %u2hi, %u1h
  %sc0 = insertelement <2 x i32> poison, i32 %sclo, i64 0
  %sc1 = insertelement <2 x i32> %sc0, i32 %schi, i64 1
  %scb = bitcast <2 x i32> %sc1 to <8 x i8>
  %sc = zext <8 x i8> %scb to <8 x i32>
  %m0 = insertelement <2 x i32> poison, i32 %mlo, i64 0
  %m1 = insertelement <2 x i32> %m0, i32 %mhi, i64 1
  %mb = bitcast <2 x i32> %m1 to <8 x i8>
  %mn = zext <8 x i8> %mb to <8 x i32>
  %sv0 = shufflevector <8 x i32> %sc, <8 x i32> poison, <16 x i32> <i32 0, i32 0, i32 0, i32 0, i32 0, i32 0, i32 0, i32 0, i32 2, i32 2, i32 2, i32 2, i32 2, i32 2, i32 2, i32 2>
  %sv1 = shufflevector <8 x i32> %sc, <8 x i32> poison, <16 x i32> <i32 1, i32 1, i32 1, i32 1, i32 1, i32 1, i32 1, i32 1, i32 3, i32 3, i32 3, i32 3, i32 3, i32 3, i32 3, i32 3>
  %sv2 = shufflevector <8 x i32> %sc, <8 x i32> poison, <16 x i32> <i32 4, i32 4, i32 4, i32 4, i32 4, i32 4, i32 4, i32 4, i32 6, i32 6, i32 6, i32 6, i32 6, i32 6, i32 6, i32 6>
  %sv3 = shufflevector <8 x i32> %sc, <8 x i32> poison, <16 x i32> <i32 5, i32 5, i32 5, i32 5, i32 5, i32 5, i32 5, i32 5, i32 7, i32 7, i32 7, i32 7, i32 7, i32 7, i32 7, i32 7>
  %pq0 = getelementptr i8, ptr %p, i64 16
  %q0 = load <64 x i8>, ptr %pq0, align 1
  %pq1 = getelementptr i8, ptr %p, i64 80
  %q1 = load <64 x i8>, ptr %pq1, align 1
  %lo0 = and <64 x i8> %q0, splat (i8 15)
  %hi0 = lshr <64 x i8> %q0, splat (i8 4)
  %lo1 = and <64 x i8> %q1, splat (i8 15)
  %hi1 = lshr <64 x i8> %q1, splat (i8 4)
  %xo = mul i64 %b, 256
  %px0 = getelementptr i8, ptr %xq, i64 %xo
  %x0 = load <64 x i8>, ptr %px0, align 1
  %px1 = getelementptr i8, ptr %px0, i64 64
  %x1 = load <64 x i8>, ptr %px1, align 1
  %px2 = getelementptr i8, ptr %px0, i64 128
  %x2 = load <64 x i8>, ptr %px2, align 1
  %px3 = getelementptr i8, ptr %px0, i64 192
  %x3 = load <64 x i8>, ptr %px3, align 1
  %t0 = call <16 x i32> @mistralpy_dp(<64 x i8> %lo0, <64 x i8> %x0)
  %t1 = call <16 x i32> @mistralpy_dp(<64 x i8> %hi0, <64 x i8> %x1)
  %t2 = call <16 x i32> @mistralpy_dp(<64 x i8> %lo1, <64 x i8> %x2)
  %t3 = call <16 x i32> @mistralpy_dp(<64 x i8> %hi1, <64 x i8> %x3)
  %s0 = mul <16 x i32> %t0, %sv0
  %s1 = mul <16 x i32> %t1, %sv1
  %s2 = mul <16 x i32> %t2, %sv2
  %s3 = mul <16 x i32> %t3, %sv3
  %s01 = add <16 x i32> %s0, %s1
  %s23 = add <16 x i32> %s2, %s3
  %s = add <16 x i32> %s01, %s23
  %sf = sitofp <16 x i32> %s to <16 x float>
  %dxp = getelementptr float, ptr %dx, i64 %b
  %dxb = load float, ptr %dxp, align 4
  %dd = fmul float %d, %dxb
  %dd0 = insertelement <16 x float> poison, float %dd, i64 0
  %ddv = shufflevector <16 x float> %dd0, <16 x float> poison, <16 x i32> zeroinitializer
  %acc1 = call <16 x float> @llvm.fma.v16f32(<16 x float> %sf, <16 x float> %ddv, <16 x float> %acc)
  %bo = mul i64 %b, 8
  %bsp = getelementptr i32, ptr %bs, i64 %bo
  %bsv = load <8 x i32>, ptr %bsp, align 4
  %mm = mul <8 x i32> %mn, %bsv
  %mf = sitofp <8 x i32> %mm to <8 x float>
  %dm = fmul float %dmin, %dxb
  %dm0 = insertelement <8 x float> poison, float %dm, i64 0
  %dmv = shufflevector <8 x float> %dm0, <8 x float> poison, <8 x i32> zeroinitializer
  %accm1 = call <8 x float> @llvm.fma.v8f32(<8 x float> %mf, <8 x float> %dmv, <8 x float> %accm)
  %b1 = add i64 %b, 1
  %done = icmp eq i64 %b1, %nb
  br i1 %done, label %exit, label %loop
exit:
  %sa = call reassoc float @llvm.vector.reduce.fadd.v16f32(float 0.0, <16 x float> %acc1)
  %sm = call reassoc float @llvm.vector.reduce.fadd.v8f32(float 0.0, <8 x float> %accm1)
  %y = fsub float %sa, %sm
  ret float %y
}
define internal <16 x i32> @mistralpy_dp(<64 x i8> %u, <64 x i8> %s) alwaysinline {
  %ui = bitcast <64 x i8> %u to <16 x i32>
  %si = bitcast <64 x i8> %s to <16 x i32>
  %r = call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> zeroinitializer, <16 x i32> %ui, <16 x i32> %si)
  ret <16 x i32> %r
}
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.vector.reduce.fadd.v16f32(float, <16 x float>)
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
