export {select, selectAll} from "d3-selection";
export {scaleOrdinal} from "d3-scale";
export {schemeCategory10} from "d3-scale-chromatic";
export {hsl} from "d3-color";
export {line} from "d3-shape";
export {min} from "d3-array";
export var version = "5.16.0 (attnlog subset)";
